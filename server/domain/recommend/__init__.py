"""The recommendation engine: prompt parsing, a field-weighted lexical index and a calibrated
re-ranker. Pure Python and numpy: no I/O, no grpc, no torch."""
