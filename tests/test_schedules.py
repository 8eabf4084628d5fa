"""Guidance scheduling (DepthG sec. 3.5) and the N schedule (supplement B.2), paper and released readings."""

from __future__ import annotations

import pytest

from repro.method.schedules import feature_samples_schedule, guidance_factor, guidance_schedule, training_batches


def test_paper_guidance_decays_lambda_and_b_together():
    for step, expected in [(0, 1.0), (249, 1.0), (250, 0.6), (499, 0.6), (500, 0.36), (6999, 0.6**27)]:
        lam, b = guidance_schedule(step, 0.19, 0.03, 250, 0.6)
        assert lam == pytest.approx(0.19 * expected) and b == pytest.approx(0.03 * expected)
    assert guidance_factor(5000, None, None) == 1.0  # Potsdam: no decay


def simulate_released(decay_step, decay_factor, batches):
    """The released training loop as described in SPEC 7.3: global_step += 3 per batch,
    the loss uses the current weight, then `if gs % decay_step == 0 and gs > 0: w *= factor`."""
    weight, gs, seen = 1.0, 0, []
    for _ in range(batches):
        seen.append(weight)
        if gs % decay_step == 0 and gs > 0:
            weight *= decay_factor
        gs += 3
    return seen


@pytest.mark.parametrize("decay_step,factor", [(250, 0.6), (300, 0.64), (400, 0.8)])
def test_released_guidance_matches_a_simulation_of_the_released_loop(decay_step, factor):
    sim = simulate_released(decay_step, factor, 2334)
    ours = [guidance_factor(t, decay_step, factor, step_unit="released") for t in range(2334)]
    assert ours == pytest.approx(sim)
    # 300 is divisible by 3: the released code decays every 100 batches, 3x as often as the paper
    if decay_step == 300:
        assert ours[101] == pytest.approx(factor) and guidance_factor(101, 300, factor) == 1.0


def test_training_batches():
    assert training_batches(7000) == 7000
    assert training_batches(7000, "released") == 2334
    with pytest.raises(ValueError):
        training_batches(7000, "epoch")


def test_paper_n_schedule_coco_vits():
    assert [feature_samples_schedule(t, 9, decrease_every=3000) for t in (0, 2999, 3000, 5999, 6000, 6999)] == [
        9, 9, 8, 8, 7, 7,
    ]
    assert feature_samples_schedule(10**6, 9, decrease_every=3000, n_min=6) == 6
    assert feature_samples_schedule(5000, 12) == 12  # fixed N (COCO ViT-B)


def test_released_n_schedule_matches_simulation():
    """Released: N = int(N * factor) whenever gs % 3000 == 0, including gs = 0."""
    n, gs, seen = 11, 0, []
    for _ in range(2334):
        seen.append(n)
        if gs % 3000 == 0:
            n = max(int(n * 0.9), 1)
        gs += 3
    ours = [
        feature_samples_schedule(t, 11, decrease_every=3000, released_factor=0.9, step_unit="released")
        for t in range(2334)
    ]
    assert ours == seen
    assert ours[0] == 11 and ours[1] == 9 and ours[1001] == 8 and ours[2001] == 7
    with pytest.raises(ValueError, match="released_factor"):
        feature_samples_schedule(5, 11, decrease_every=3000, step_unit="released")


def test_bad_arguments():
    with pytest.raises(ValueError):
        guidance_factor(-1, 250, 0.6)
    with pytest.raises(ValueError):
        guidance_factor(1, 0, 0.6)
    with pytest.raises(ValueError):
        feature_samples_schedule(1, 0)


@pytest.mark.parametrize("fidelity", ["paper", "released"])
def test_every_registered_entry_has_a_feature_sample_schedule_in_both_fidelities(fidelity):
    """The trainer's call, for every entry: supp4/n6 in the released profile had no factor (a crash at step 0)."""
    from repro.config import list_entries, load_entry

    for name in list_entries():
        s = load_entry(name, [f"fidelity={fidelity}"])
        ns = [feature_samples_schedule(step, s.sampling.feature_samples, decrease_every=s.sampling.decrease_every,
                                       n_min=s.sampling.n_min, released_n_start=s.sampling.released_n_start,
                                       released_factor=s.sampling.released_factor, step_unit=s.train.step_unit)
              for step in (0, 1, 3001, 6999)]
        assert all(1 <= n <= s.sampling.feature_samples for n in ns), (name, ns)
        if fidelity == "released" and s.method == "depthg" and s.sampling.decrease_every:
            assert s.sampling.released_factor is not None, name
