"""Data-driven initialisations: EVA, LoRA-DA and LoRA-Init (TSD-guided), all on :mod:`shared.statistics`."""
