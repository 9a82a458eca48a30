// The operator console's only script (inlined). Everything works without it;
// with it the overview refreshes itself every 5 s (polling a fragment of
// server-rendered HTML), and a region announces that it did.
(function () {
  var live = document.querySelector('[data-refresh]');
  if (!live) return;
  var url = live.getAttribute('data-refresh');
  setInterval(function () {
    fetch(url, { credentials: 'same-origin', headers: { 'Accept': 'text/html' } })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) {
        live.innerHTML = html;
        live.setAttribute('data-refreshed', new Date().toISOString());
      })
      .catch(function () { /* keep the last view; the next poll tries again */ });
  }, 5000);
})();
