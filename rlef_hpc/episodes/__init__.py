"""Multi-turn episodes with execution feedback: templates, code extraction, the runner, and the
token-exact conversation they build. Knows problems, the sandbox and a generate() callable."""

from rlef_hpc.episodes.conversation import Conversation, TemplateError
from rlef_hpc.episodes.extract import code_blocks, extract_code
from rlef_hpc.episodes.runner import (
    EpisodeConfig,
    EpisodeRunner,
    EpisodesStopped,
    GenerateFn,
    Generation,
    StopFn,
)
from rlef_hpc.episodes.scripted import ScriptedPolicy
from rlef_hpc.episodes.templates import (
    Templates,
    feedback_message,
    initial_prompt,
    public_feedback,
    truncate,
)

__all__ = [
    "Conversation",
    "EpisodeConfig",
    "EpisodeRunner",
    "EpisodesStopped",
    "GenerateFn",
    "Generation",
    "ScriptedPolicy",
    "StopFn",
    "TemplateError",
    "Templates",
    "code_blocks",
    "extract_code",
    "feedback_message",
    "public_feedback",
    "initial_prompt",
    "truncate",
]
