"""The ablation study (tools/ablate.py): grids of variants, their runs, the quality stage, seed statistics, the report."""
