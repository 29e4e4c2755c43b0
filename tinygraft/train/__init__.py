"""Training: the one loop (loop.py) and what plugs into it (methods/), the settings of the jobs (config.py), the run
directory and the one loader of runs and pretrained directories (run_dir.py, runs.py), and the jobs themselves:
pretrain.py, finetune.py, compare.py."""
