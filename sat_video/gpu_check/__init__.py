"""``tools/gpu_check.py``: one prepared command that checks and measures everything CUDA-specific, section by section
(:mod:`.sections`), each in its own process with its own time limit, writing its rows into one Markdown report as it
goes; ``--quick`` runs the same code at tiny sizes on a CPU (CI), so the check never rots between GPU loans."""
