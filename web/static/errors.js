// Shared by the chat and the admin pages: htmx does not swap 4xx/5xx answers,
// so show their message in the page's #error-bar. Everything works without it.
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

  document.addEventListener("htmx:responseError", function (evt) {
    var xhr = evt.detail.xhr;
    var text = "Request failed (" + xhr.status + ")";
    try {
      var body = JSON.parse(xhr.responseText);
      if (body && body.error && body.error.message) text = body.error.message;
    } catch (e) {
      // An HTML error fragment: read its text in an inert document (nothing in it loads or runs).
      var doc = new DOMParser().parseFromString(xhr.responseText, "text/html");
      if (doc.body.textContent.trim()) text = doc.body.textContent.trim();
    }
    showError(text);
  });
  document.addEventListener("htmx:sendError", function () {
    showError("The server could not be reached. Check your connection and try again.");
  });
})();
