"""Post-hoc analysis of run folders: discovery (runs), scalar reading (events), checks (validate), ablation
tables and plots (compare, stats, plots), and the reward/Q bound shared with the trainer's monitor (bounds)."""
