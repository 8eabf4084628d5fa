"""Floor 8: SLURM through submitit: the job objects, array submission, the cost model and ``repro plan``."""
