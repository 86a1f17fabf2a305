// LoRA Kit (lorakit): make the WebUI's own progress bar follow a lorakit job.
// Each Start button calls one of these through gradio's _js: it makes an id_task, asks the WebUI's
// requestProgress (javascript/progressbar.js, WebUI 1.6+) to poll /internal/progress for it, and passes the id
// to Python as the first input, where the job registers under the same id.

function lorakitFollow(progressElementId, args) {
    var id = randomId();
    var container = gradioApp().getElementById(progressElementId);
    requestProgress(id, container, null, function() {});
    var res = Array.from(args);
    res[0] = id;
    return res;
}

function lorakit_start_train() {
    return lorakitFollow("lorakit_train_progress", arguments);
}

function lorakit_start_slider() {
    return lorakitFollow("lorakit_slider_progress", arguments);
}

function lorakit_start_merge() {
    return lorakitFollow("lorakit_merge_progress", arguments);
}
