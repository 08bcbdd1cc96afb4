"""cytopipe: Pap cytology classification pipeline."""
