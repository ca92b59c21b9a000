"""The sbatch template and the shipped cluster profiles, installed as the package ``hpc_jobs.templates``
(setup.cfg's ``package_dir``); hpc_jobs/profiles.py finds them with importlib.resources."""
