"""Label-free distillation of a transformers teacher into a timm student (paper, section 5.2).

    python examples/distill.py --dataset uoft-cs/cifar10 --output-dir runs/kd \
        --teacher openai/clip-vit-base-patch16 --student resnet50 --batch-size 512
    accelerate launch --num_processes 8 examples/distill.py run.yaml

Same as the installed ``mvmr-distill``; ``--help`` lists every option.
"""

import sys

from mvmr_hf.cli.train import distill_main

if __name__ == "__main__":
    sys.exit(distill_main())
