"""Legacy module path of the SLURM job objects, kept so that queued work survives an upgrade.

submitit pickles each job object with its class's module path. Tasks submitted before the job
classes moved to :mod:`repro.cluster.jobs` (pending, or requeued after preemption) name
``repro.jobs.EntryJob`` and friends; this alias resolves them to the same classes. Jobs submitted
since name ``repro.cluster.jobs``. Nothing in repro imports this module.
"""

from repro.cluster.jobs import DataJob, EntryJob, ReleasedJob, Resources

__all__ = ["DataJob", "EntryJob", "ReleasedJob", "Resources"]
