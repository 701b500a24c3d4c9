"""Problems (CodeContests schema, bundled and synthetic sets) and the trajectory record."""

from rlef_hpc.data.codecontests import (
    LoadStats,
    ProblemFormatError,
    iter_problems,
    load_problems,
    parse_problem,
    problem_record,
)
from rlef_hpc.data.problem import Problem, Solution
from rlef_hpc.data.trajectory import Trajectory, Turn

__all__ = [
    "LoadStats",
    "Problem",
    "ProblemFormatError",
    "Solution",
    "Trajectory",
    "Turn",
    "iter_problems",
    "load_problems",
    "parse_problem",
    "problem_record",
]
