# The verbs people type. `make test` and `make demo` set up what they need themselves.
PYTHON ?= python3
VENV ?= .venv
DEPS_HASH := $(shell sha256sum requirements.lock | cut -c1-16)
DEPS_STAMP := $(VENV)/.deps-$(DEPS_HASH)
SETUP_STAMP := build/.setup-$(DEPS_HASH)
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup test demo lock clean container sif results check-results reproduce-supplement reproduce-all \
	reproduce-checkpoints reproduce-table1 reproduce-table2 reproduce-table3 reproduce-table4 reproduce-table5 reproduce-table6

setup: $(SETUP_STAMP)

# Third-party dependencies: installed once per lock file (CI caches $(VENV) keyed on the same hash).
$(DEPS_STAMP): requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	rm -f $(VENV)/.deps-*
	touch $@

# The package itself, editable, re-linked for every checkout.
$(SETUP_STAMP): $(DEPS_STAMP) pyproject.toml
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	mkdir -p build && rm -f build/.setup-*
	touch $@

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The main job on the default data: DepthG end to end on the 10-image NYUv2 sample (CPU, minutes).
# DINO_CHECKPOINT=/path/dino_deitsmall8_300ep_pretrain.pth uses real weights; without it, random weights (said loudly).
DATA ?= ../shared/data
DINO_CHECKPOINT ?=
demo: setup
	$(BIN)/repro demo --data $(DATA) --work-dir build/demo $(if $(DINO_CHECKPOINT),--checkpoint $(DINO_CHECKPOINT))

# Regenerate requirements.lock from the top-level pins in requirements.in.
lock:
	rm -rf build/lockenv && $(PYTHON) -m venv build/lockenv
	build/lockenv/bin/pip install --quiet --upgrade pip && build/lockenv/bin/pip install --quiet -r requirements.in
	{ echo "# Full resolved dependency set (generated: pip freeze of requirements.in in a fresh venv, Python 3.11, linux x86_64)."; \
	  echo "# Shared by CI, the container and the cluster. Regenerate with: make lock"; \
	  build/lockenv/bin/pip freeze | grep -v -E '^(pip|setuptools|wheel)=='; } > requirements.lock

clean:
	rm -rf build .pytest_cache

# Every table entry as SLURM array jobs (submitit), or locally where there is no SLURM.
# Variables: REPRO_DATA (dataset roots), REPRO_WORK (shared work folder), SEEDS, PARTITION,
# REPRO_SIF (Apptainer image; unset = host environment), EXECUTOR (auto | slurm | local),
# FIDELITY (both | paper | released: every entry as the paper is written and/or as the released code ran),
# SCALE (full | smoke: the dress rehearsal, every stage on a few images, one seed, one CPU per job, under
# $(REPRO_WORK)/smoke), SET ("key=value key=value": config overrides for every entry), the request of every
# job GPUS, CPUS, MEM_GB, TIME_MIN (default: by dataset and backbone; at SCALE=smoke 0 GPUs, 1 CPU, 6 GB,
# 30 min), DRY_RUN=1 (write the launch record and the plan, submit nothing).
REPRO_DATA ?=
REPRO_WORK ?= runs
SCALE ?= full
SEEDS ?= $(if $(filter smoke,$(SCALE)),1,3)
PARTITION ?=
REPRO_SIF ?=
EXECUTOR ?= auto
FIDELITY ?= both
SET ?=
GPUS ?=
CPUS ?=
MEM_GB ?=
TIME_MIN ?=
DRY_RUN ?=
export REPRO_DATA REPRO_WORK
# what every launch verb passes on: scale, overrides, resources, dry run
JOB_ARGS = --scale $(SCALE) $(foreach kv,$(SET),--set $(kv)) $(if $(GPUS),--gpus $(GPUS)) $(if $(CPUS),--cpus $(CPUS)) \
	$(if $(MEM_GB),--mem-gb $(MEM_GB)) $(if $(TIME_MIN),--time-min $(TIME_MIN)) $(if $(filter-out 0,$(DRY_RUN)),--dry-run) \
	$(if $(PARTITION),--partition $(PARTITION)) $(if $(REPRO_SIF),--sif $(REPRO_SIF))
LAUNCH = $(BIN)/repro launch --seeds $(SEEDS) --fidelity $(FIDELITY) --executor $(EXECUTOR) --work-dir $(REPRO_WORK) \
	$(JOB_ARGS)
TABLES := table1 table2 table3 table4 table5 table6

$(addprefix reproduce-,$(TABLES)): reproduce-%: setup
	@test -n "$(REPRO_DATA)" || { echo "set REPRO_DATA to the folder holding cocostuff/ cityscapes/ potsdam/ nyuv2/" >&2; exit 1; }
	$(LAUNCH) $*

reproduce-supplement: setup
	@test -n "$(REPRO_DATA)" || { echo "set REPRO_DATA to the folder holding cocostuff/ cityscapes/ potsdam/ nyuv2/" >&2; exit 1; }
	$(LAUNCH) supp3 supp4 supp5 supp6

reproduce-all: setup
	@test -n "$(REPRO_DATA)" || { echo "set REPRO_DATA to the folder holding cocostuff/ cityscapes/ potsdam/ nyuv2/" >&2; exit 1; }
	$(LAUNCH) $(TABLES) supp3 supp4 supp5 supp6

# The published STEGO/DepthG checkpoints present in $(REPRO_WEIGHTS)/released (or RELEASED_DIR), scored on
# their entries' validation sets in the released protocol: one array task per file, n = 1
# (`repro released list` shows the seven files and where they are published).
RELEASED_DIR ?=
reproduce-checkpoints: setup
	@test -n "$(REPRO_DATA)" || { echo "set REPRO_DATA to the folder holding cocostuff/ cityscapes/ potsdam/ nyuv2/" >&2; exit 1; }
	$(BIN)/repro released launch --executor $(EXECUTOR) --work-dir $(REPRO_WORK) $(if $(RELEASED_DIR),--dir $(RELEASED_DIR)) \
		$(JOB_ARGS)

# RESULTS.md from the runs in REPRO_WORK (paper vs reproduced; hand-written text is kept). Smoke runs
# ($(REPRO_WORK)/smoke) only fill its "Pipeline check" block. RESULTS=file writes another file (its figures
# and model index beside it).
RESULTS ?= RESULTS.md
results: setup
	$(BIN)/repro compare --work-dir $(REPRO_WORK) --out $(RESULTS)

# CI regression: re-run the demo-scale entry and compare with the numbers recorded in RESULTS.md.
check-results: setup
	$(BIN)/repro check-results --data $(DATA) --results RESULTS.md

# Container images (Containerfile / apptainer.def); weights and data are mounted at run time.
IMAGE ?= repro:latest
SIF ?= build/repro.sif
ENGINE ?= $(shell command -v podman || command -v docker)
APPTAINER ?= $(shell command -v apptainer || command -v singularity)

container:
	@test -n "$(ENGINE)" || { echo "make container: no container engine found; install podman or docker, or set ENGINE=..." >&2; exit 1; }
	$(ENGINE) build -f Containerfile -t $(IMAGE) .

sif:
	@test -n "$(APPTAINER)" || { echo "make sif: apptainer not found; install apptainer (or singularity), or set APPTAINER=..." >&2; exit 1; }
	mkdir -p $(dir $(SIF))
	$(APPTAINER) build $(SIF) apptainer.def
