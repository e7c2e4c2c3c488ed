/* Header-only: see include/CAtomics.h. */
