"""SOMA query (Census or a local Census-shaped collection) -> WebDataset shards + manifest.json.

    python launchers/build_shards.py --source runs/demo/atlas --out runs/demo/shards --workers 2
    python launchers/build_shards.py --source stable --out shards/lung \\
        --obs-filter "is_primary_data == True and tissue_general == 'lung'" --workers 16
    python launchers/build_shards.py --source ATLAS --out SHARDS --dry-run

A run killed at any point resumes where it stopped when started again with the same arguments.
"""

import sys

from clopdit_dist.cli import main

if __name__ == "__main__":
    main(["data", "shards", *sys.argv[1:]])
