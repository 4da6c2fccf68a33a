// tuneloop's only script: small conveniences on top of htmx. Everything works without it.
(function () {
  "use strict";

  function showError(text) {
    var bar = document.getElementById("error-bar");
    if (!bar) return;
    bar.textContent = text;
    bar.hidden = false;
    clearTimeout(showError.timer);
    showError.timer = setTimeout(function () { bar.hidden = true; }, 8000);
  }

  // htmx does not swap 4xx/5xx answers: show their message instead.
  document.addEventListener("htmx:responseError", function (evt) {
    var xhr = evt.detail.xhr;
    var text = "Request failed (" + xhr.status + ")";
    try {
      var body = JSON.parse(xhr.responseText);
      if (body && body.error && body.error.message) text = body.error.message;
    } catch (e) {
      var div = document.createElement("div");
      div.innerHTML = xhr.responseText;
      if (div.textContent.trim()) text = div.textContent.trim();
    }
    showError(text);
  });
  document.addEventListener("htmx:sendError", function () {
    showError("The server could not be reached. Check your connection and try again.");
  });

  // A/B buttons stay disabled until both answers have finished streaming.
  function refreshComparisons() {
    document.querySelectorAll(".comparison").forEach(function (section) {
      var busy = section.querySelector('[data-status="pending"], [data-status="streaming"]');
      section.querySelectorAll(".choice-form button").forEach(function (b) { b.disabled = !!busy; });
    });
  }
  document.addEventListener("htmx:load", refreshComparisons);
  document.addEventListener("htmx:afterSettle", refreshComparisons);
  document.addEventListener("DOMContentLoaded", refreshComparisons);

  // Keyboard: Enter sends, Shift+Enter is a new line; 1-4 / a b t x choose in an A/B turn.
  document.addEventListener("keydown", function (evt) {
    var target = evt.target;
    if (target && target.id === "composer-input") {
      if (evt.key === "Enter" && !evt.shiftKey && !evt.isComposing) {
        evt.preventDefault();
        if (target.value.trim()) target.form.requestSubmit();
      }
      return;
    }
    if (evt.ctrlKey || evt.metaKey || evt.altKey) return;
    if (target && /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName)) return;
    var forms = document.querySelectorAll(".comparison .choice-form");
    if (!forms.length) return;
    var form = forms[forms.length - 1];
    var key = evt.key.toLowerCase();
    form.querySelectorAll("button[data-key]").forEach(function (button) {
      if (!button.disabled && button.dataset.key.split(" ").indexOf(key) >= 0) {
        evt.preventDefault();
        button.click();
      }
    });
  });

  // Keep the newest tokens in view while an answer streams in.
  document.addEventListener("htmx:sseMessage", function () {
    var thread = document.getElementById("thread");
    if (thread) window.scrollTo(0, document.body.scrollHeight);
  });
})();
