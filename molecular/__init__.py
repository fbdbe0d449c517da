"""unirep's atomistic backend: atoms are tokens, the graph index is the token set's ``batch``.

Modules (import them directly; ``import molecular`` stays light):

- :mod:`molecular.data` — structures, readers (extxyz/ASE, rdkit SMILES/SDF, biotite PDB/mmCIF/CCD), validation,
  neighbour graphs, batches, splits, on-disk cache, labelling (GFN2-xTB via tblite, MMFF94), geometry sampling;
- :mod:`molecular.models` — MACE (ScaleShiftMACE) from plain arguments, per-interaction features as token sets;
- :mod:`molecular.teachers` — frozen atomistic teachers (MACE files, the project's foundation MACE, hook adapters);
- :mod:`molecular.task` — ``MaceTask`` (MACE's energy/force loss, optional MACE-REPA alignment, evaluation);
- :mod:`molecular.calculator` — an ASE calculator for trained models;
- :mod:`molecular.quickstart` — data and the teacher made on first use.

See docs/molecular.md.
"""
