"""Build the small reproducible protein set under data/proteins/ (offline sources only; see data/proteins/README.md).

.venv/bin/python scripts/make_protein_data.py                 # 48 PeptideBuilder peptides + MDAnalysisTests proteins
.venv/bin/python scripts/make_protein_data.py --num-peptides 96 --overwrite
"""

from __future__ import annotations

import argparse
import collections
import json

from molecular.proteins.data import DEFAULT_ROOT, make_protein_set, mdanalysis_data_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=DEFAULT_ROOT)
    ap.add_argument("--num-peptides", type=int, default=48)
    ap.add_argument("--min-length", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-mdanalysis", action="store_true", help="peptides only, even if MDAnalysisTests is installed")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()
    if not args.no_mdanalysis and mdanalysis_data_dir() is None:
        print(
            "MDAnalysisTests is not installed: peptides only (pip install -c constraints.txt --no-deps MDAnalysisTests)"
        )
    manifest = make_protein_set(
        args.root,
        num_peptides=args.num_peptides,
        peptide_lengths=(args.min_length, args.max_length),
        seed=args.seed,
        mdanalysis=not args.no_mdanalysis,
        overwrite=args.overwrite,
    )
    count = collections.Counter((r["split"], r["source"].split("/")[0]) for r in manifest["proteins"])
    residues = collections.Counter()
    for r in manifest["proteins"]:
        residues[r["split"]] += r["num_residues"]
    print(json.dumps({f"{s}/{src}": n for (s, src), n in sorted(count.items())}, indent=1))
    print("residues per split:", dict(residues))
    print(f"wrote {args.root}/manifest.json")


if __name__ == "__main__":
    main()
