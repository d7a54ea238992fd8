"""MV-MR self-supervised pretraining with hand-crafted representations (paper, section 5.1).

    python examples/pretrain.py --dataset tanganke/stl10 --split unlabeled --output-dir runs/ssl \
        --student resnet50 --batch-size 256 --grad-accum 4
    accelerate launch --num_processes 8 examples/pretrain.py run.yaml

Same as the installed ``mvmr-pretrain``; ``--help`` lists every option.
"""

import sys

from mvmr_hf.cli.train import pretrain_main

if __name__ == "__main__":
    sys.exit(pretrain_main())
