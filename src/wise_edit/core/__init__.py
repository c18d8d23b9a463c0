"""What every editing method shares: its config base (`config`), the wrapped layer and
per-sequence routing state (`layer`), model surgery (`attach`), edit rows (`rows`), the
fast editing forward (`fastpath`), the optimisation loop (`fit`), seeds (`seeds`), the
shapes every method fills in (`draft`: EditResult, Draft, the Editor protocol), the
editor base with the one edit template (`editor`), the save format (`persistence`) and
the checks of a loaded save (`validate`)."""
