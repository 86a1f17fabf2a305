"""Stand-in of ``modules.progress`` (WebUI 1.10.1): task bookkeeping and what ``/internal/progress`` answers."""

import time
from collections import OrderedDict

from modules import shared

current_task = None
pending_tasks = OrderedDict()
finished_tasks = []


def add_task_to_queue(id_job):
    pending_tasks[id_job] = time.time()


def start_task(id_task):
    global current_task
    current_task = id_task
    pending_tasks.pop(id_task, None)


def finish_task(id_task):
    global current_task
    if current_task == id_task:
        current_task = None
    finished_tasks.append(id_task)
    if len(finished_tasks) > 16:
        finished_tasks.pop(0)


def progressapi(id_task):
    """The fields of the WebUI's ProgressResponse, computed the way ``progress.progressapi`` does."""
    active = id_task == current_task
    response = {"active": active, "queued": id_task in pending_tasks, "completed": id_task in finished_tasks}
    if not active:
        return response
    state = shared.state
    progress = 0.0
    if state.job_count > 0:
        progress += state.job_no / state.job_count
    if state.sampling_steps > 0 and state.job_count > 0:
        progress += 1 / state.job_count * state.sampling_step / state.sampling_steps
    response.update(progress=min(progress, 1), textinfo=state.textinfo)
    return response
