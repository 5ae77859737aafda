#!/usr/bin/env python
"""SimMIM pretraining with 🤗 Accelerate: `accelerate launch examples/run_pretraining.py --output_dir runs/demo`.

The job itself is `simmim_hf/run_pretraining.py` (installed as the `simmim-pretrain` command, and runnable as
`accelerate launch -m simmim_hf.run_pretraining`); `--help` lists its arguments."""

import sys

from simmim_hf.run_pretraining import main

if __name__ == "__main__":
    sys.exit(main())
