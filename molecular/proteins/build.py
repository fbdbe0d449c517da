"""Offline protein structures: peptides with chosen backbone torsions (PeptideBuilder) and CCD ideal residues.

``PeptideBuilder`` (Tien et al. 2013, ``mtien/PeptideBuilder``) places heavy atoms from ideal internal geometry
and given phi / psi / omega; :func:`secondary_structure_peptide` strings helix, strand, polyproline and coil
segments together with torsions drawn around the basins of the Ramachandran plot, so a small set of peptides
carries known secondary structure (for probes and for training the autoencoder and the flow).
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence

import numpy as np

from molecular.data import StructureError

from .constants import ONE_LETTER
from .io import ProteinStructure, ReadOptions, protein_from_atom_array

__all__ = ["TORSION_BASINS", "build_peptide", "secondary_structure_peptide", "ccd_residue_protein"]

# (phi, psi) centres in degrees and the spread used around them
TORSION_BASINS: dict[str, tuple[float, float, float]] = {
    "helix": (-63.0, -42.0, 6.0),
    "strand": (-120.0, 130.0, 10.0),
    "ppii": (-75.0, 145.0, 8.0),
    "left": (60.0, 45.0, 8.0),  # left-handed helix region (glycine, asparagine)
}
_THREE = {v: k for k, v in ONE_LETTER.items()}


def _as_list(value: float | Sequence[float], n: int, name: str) -> list[float]:
    if isinstance(value, int | float):
        return [float(value)] * n
    out = [float(v) for v in value]
    if len(out) != n:
        raise ValueError(f"{name}: {len(out)} values for a peptide of {n} residues")
    return out


def build_peptide(
    sequence: str,
    phi: float | Sequence[float] = -63.0,
    psi: float | Sequence[float] = -42.0,
    omega: float | Sequence[float] = 180.0,
    id: str | None = None,
    rotamer_seed: int | None = None,
    hydrogens: str = "drop",
) -> ProteinStructure:
    """A peptide of one-letter ``sequence`` with torsions in degrees (scalars or one per residue; phi of the first
    and psi/omega of the last residue are undefined and ignored). ``rotamer_seed`` draws side-chain rotamers at
    random (PeptideBuilder's library), otherwise its default rotamers. ``hydrogens='add'`` adds them (hydride)."""
    import biotite.structure.io.pdb as pdb

    try:
        import Bio.PDB as biopdb
        from PeptideBuilder import Geometry, make_structure_from_geos
    except ImportError as err:
        raise ImportError(
            "building peptides needs PeptideBuilder: .venv/bin/pip install -c constraints.txt PeptideBuilder "
            "(or the project's `proteins` extra)"
        ) from err

    sequence = sequence.upper()
    bad = sorted(set(sequence) - set(_THREE))
    if not sequence or bad:
        raise StructureError(f"peptide {sequence!r}: unknown one-letter codes {bad}; use the 20 canonical residues")
    n = len(sequence)
    phis, psis, omegas = _as_list(phi, n, "phi"), _as_list(psi, n, "psi"), _as_list(omega, n, "omega")
    state = random.getstate()
    if rotamer_seed is not None:
        random.seed(rotamer_seed)
    try:
        geos = []
        for i, aa in enumerate(sequence):
            g = Geometry.geometry(aa)
            if rotamer_seed is not None and hasattr(g, "generateRandomRotamers"):
                g.generateRandomRotamers()
            g.phi = phis[i]
            g.psi_im1 = psis[i - 1] if i else psis[0]
            g.omega = omegas[i - 1] if i else omegas[0]
            geos.append(g)
        structure = make_structure_from_geos(geos)
    finally:
        random.setstate(state)
    buf = io.StringIO()
    writer = biopdb.PDBIO()
    writer.set_structure(structure)
    writer.save(buf)
    arr = pdb.PDBFile.read(io.StringIO(buf.getvalue())).get_structure(model=1)
    name = id or f"peptide/{sequence}"
    return protein_from_atom_array(arr, name, name, ReadOptions(hydrogens=hydrogens))


def secondary_structure_peptide(
    length: int, seed: int, segment: tuple[int, int] = (4, 10), id: str | None = None, hydrogens: str = "drop"
) -> tuple[ProteinStructure, list[str]]:
    """A random-sequence peptide of helix / strand / polyproline / coil segments; returns it and the per-residue
    segment labels (``"helix"``, ``"strand"``, ``"ppii"``, ``"coil"``). Coil residues draw any basin."""
    rng = np.random.default_rng(seed)
    letters = "ARNDCQEGHILKMFPSTWYV"
    labels: list[str] = []
    while len(labels) < length:
        kind = str(rng.choice(["helix", "strand", "ppii", "coil"], p=[0.4, 0.25, 0.15, 0.2]))
        labels += [kind] * int(rng.integers(segment[0], segment[1] + 1))
    labels = labels[:length]
    phi, psi = [], []
    for kind in labels:
        basin = kind if kind != "coil" else str(rng.choice(["helix", "strand", "ppii", "left"]))
        c_phi, c_psi, sd = TORSION_BASINS[basin]
        spread = sd if kind != "coil" else 2 * sd
        phi.append(c_phi + spread * rng.standard_normal())
        psi.append(c_psi + spread * rng.standard_normal())
    # proline only where its ring allows phi near -65; glycine anywhere
    seq = []
    for k in range(length):
        aa = str(rng.choice(list(letters)))
        if aa == "P" and not -90 < phi[k] < -50:
            aa = "A"
        if phi[k] > 0 and aa not in "GN":
            aa = "G"
        seq.append(aa)
    pep = build_peptide("".join(seq), phi, psi, id=id or f"ss_peptide/{seed}", rotamer_seed=seed, hydrogens=hydrogens)
    return pep, labels


def ccd_residue_protein(name: str, hydrogens: str = "keep") -> ProteinStructure:
    """One residue with the ideal coordinates of biotite's Chemical Component Dictionary (offline)."""
    import biotite.structure.info as info

    try:
        arr = info.residue(name.upper())
    except Exception as err:
        raise StructureError(f"CCD residue {name!r}: not in the Chemical Component Dictionary ({err})") from err
    arr.res_id[:] = 1
    arr.chain_id[:] = "A"
    arr = arr[arr.atom_name != "OXT"] if hydrogens == "drop" else arr
    return protein_from_atom_array(arr, f"ccd/{name.upper()}", f"CCD:{name.upper()}", ReadOptions(hydrogens=hydrogens))
