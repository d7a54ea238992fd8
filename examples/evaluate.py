"""Linear probe, kNN and zero-shot accuracy of frozen features (paper, section 6: linear evaluation).

    python examples/evaluate.py --model runs/kd/student --dataset tanganke/stl10 \
        --protocol linear,knn --update-card
    python examples/evaluate.py --model openai/clip-vit-base-patch16 --dataset tanganke/stl10 \
        --protocol zero-shot,linear

Same as the installed ``mvmr-evaluate``; ``--help`` lists every option.
"""

import sys

from mvmr_hf.cli.release import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
