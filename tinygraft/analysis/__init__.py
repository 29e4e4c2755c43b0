"""Looking inside: `info` (what a run or a pretrained directory holds), `cka` (similarity.py: how alike two
checkpoints' layers are), `probe` (what each layer holds) and `forgetting` (what continued runs lost); later the
advisor."""
