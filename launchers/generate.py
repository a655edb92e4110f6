"""Stage 3: prompts -> generated cells as .h5ad.

    python launchers/generate.py --run runs/demo/run --prompt "cell type: B cell; tissue: lung" \\
        --n 1000 --guidance 2.0 --steps 20 --out gen.h5ad
    python launchers/generate.py --run RUN --prompts-file prompts.txt --sampler sde --noise 0.5 --out gen.h5ad
    python launchers/generate.py --run RUN --interpolate "naive B cell" "plasma cell" --points 10 --out traj.h5ad
"""

import sys

from clopdit_dist.cli import main

if __name__ == "__main__":
    main(["generate", *sys.argv[1:]])
