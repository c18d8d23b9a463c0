"""What every editing method shares: its config base (`config`), the wrapped layer and
per-sequence routing state (`layer`), model surgery (`attach`), edit rows (`rows`), the
fast editing forward (`fastpath`), the optimisation loop (`fit`), seeds (`seeds`), the
editor base with the one edit template (`editor`), and the save format (`persistence`)."""
