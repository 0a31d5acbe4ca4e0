"""Work that drives the reader over many studies: grounding evaluation on phantoms (:mod:`evaluation`) and
calibration of the grounding settings (:mod:`calibrate`)."""
