(function () {
  var every = __REFRESH__ * 1000, staleAfter = __STALE__ * 1000;
  var banner = document.getElementById('stale');
  function check() {
    var report = document.querySelector('main').getAttribute('data-report');
    if (report && Date.now() - Number(report) * 1000 > staleAfter) {
      banner.textContent = 'Stale: the last health check ran ' +
        Math.round((Date.now() - Number(report) * 1000) / 60000) + ' min ago.';
      banner.hidden = false;
    }
  }
  function refresh() {
    fetch(location.pathname, {cache: 'no-store', credentials: 'same-origin'})
      .then(function (answer) { if (!answer.ok) throw new Error(answer.status); return answer.text(); })
      .then(function (text) {
        var page = new DOMParser().parseFromString(text, 'text/html');
        document.querySelector('header').replaceWith(page.querySelector('header'));
        document.querySelector('main').replaceWith(page.querySelector('main'));
        banner = document.getElementById('stale');
        check();
      })
      .catch(function () {
        banner.textContent = 'Stale: the bot has not answered since ' +
          new Date().toLocaleTimeString() + '; showing what it said last.';
        banner.hidden = false;
      });
  }
  check();
  setInterval(refresh, every);
})();
