"""Everything that touches torch and diffusers. Imported lazily: the catalog and the
recommender run without loading torch."""
