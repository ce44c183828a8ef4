"""What can go wrong with a teacher, as errors the loop and the CLI can act on."""


class TeacherUnavailableError(RuntimeError):
    """The teacher could not be reached or kept failing (a server down for longer than
    teacher.retry_for_s). The loop saves a checkpoint and stops; `--resume` continues."""


class TeacherResponseError(RuntimeError):
    """A teacher answered with something that cannot be what was asked (wrong length, a missing
    token, a non-finite log-prob): a bug or a misconfigured server, never retried."""


def what_to_do(err: Exception) -> str:
    """The fix a teacher failure asks for, before `--resume`."""
    if isinstance(err, TeacherUnavailableError):
        return "restart the server"
    return "fix what this names (the server, or the teacher settings)"
