// The chat page's conveniences on top of htmx (errors.js shows failed requests). Everything works without it.
(function () {
  "use strict";

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

  // A turn posted in place empties the composer once the server took it.
  document.addEventListener("htmx:afterRequest", function (evt) {
    var form = evt.detail.elt;
    if (evt.detail.successful && form.matches && form.matches("form.composer[hx-post]")) form.reset();
  });

  // Keep the newest tokens in view while an answer streams in.
  document.addEventListener("htmx:sseMessage", function () {
    var thread = document.getElementById("thread");
    if (thread) window.scrollTo(0, document.body.scrollHeight);
  });
})();
