"""Desktop simulator: N bot agents of one zone speaking the real desktop protocol."""
