"""Everything that runs or reads many runs: suites and their runner, the leaderboard, ``kdzoo speed``.

Training never imports this package; it sits above the engine and below the command line.
"""
