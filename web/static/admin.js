// The admin dashboard's conveniences on top of htmx (errors.js shows failed requests). Everything works without it.
(function () {
  "use strict";

  // A new API key is shown once: focusing its field selects it, ready to copy.
  document.addEventListener("focusin", function (evt) {
    if (evt.target.matches && evt.target.matches("input.key-value")) evt.target.select();
  });
})();
