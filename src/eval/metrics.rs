//! AUROC, FPR95, AUPR-In/Out and calibration (method.md §10).
