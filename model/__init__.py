"""The thin MiniMax-M1 wrapper (imported as ``mm1_model``)."""
