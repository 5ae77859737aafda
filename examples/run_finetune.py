#!/usr/bin/env python
"""Fine-tune or linearly probe a SimMIM encoder with 🤗 Accelerate:
`accelerate launch examples/run_finetune.py --preset vit-nano-p4-32 --output_dir out/digits`.

The job itself is `simmim_hf/run_finetune.py` (installed as the `simmim-finetune` command, and runnable as
`accelerate launch -m simmim_hf.run_finetune`); `--help` lists its arguments."""

import sys

from simmim_hf.run_finetune import main

if __name__ == "__main__":
    sys.exit(main())
