"""Research probes: scripts that established a fact about the hardware or a design (benchmarks/NOTES.md)."""
