// backburner dashboard: the little behaviour htmx does not cover (CSP allows only 'self' scripts)
// A form with data-confirm asks before it is sent (cancel a batch, revoke a key).
document.addEventListener("submit", function (event) {
  var form = event.target;
  var question = form && form.getAttribute && form.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});
