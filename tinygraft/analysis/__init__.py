"""Looking inside: `info` (what a run or a pretrained directory holds); later the probes, CKA, the forgetting
report and the advisor."""
