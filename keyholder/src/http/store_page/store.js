// The keyholder's store page: reads the form, sends the credential straight to this keyholder's
// /v1/store (same origin), and shows only what the keyholder answers (service and meta, never the
// secret). No third-party code, and no markup built from text: every text goes in through textContent.
'use strict';

(function () {
  const form = document.getElementById('store-form');
  if (!form) {
    return;
  }
  const result = document.getElementById('result');
  const storedMeta = document.getElementById('stored-meta');
  const button = document.getElementById('submit');
  const secretBox = document.getElementById('secret');
  const sensitive = JSON.parse(form.dataset.sensitive);
  const ticket = form.elements.ticket.value;
  const service = form.elements.service.value;

  // The ticket stays out of the address bar and the history from now on.
  if (window.history && history.replaceState) {
    history.replaceState(null, '', location.pathname);
  }

  function show(state, text) {
    result.dataset.state = state;
    result.textContent = text;
  }

  function tokenData() {
    const data = {};
    const lines = form.elements.meta.value.split('\n');
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i].trim();
      if (line === '') {
        continue;
      }
      const eq = line.indexOf('=');
      if (eq <= 0) {
        // Never echo the line: it may be a secret pasted in the wrong box.
        throw new Error('Line ' + (i + 1) + ' of the other fields is not key=value.');
      }
      const key = line.slice(0, eq).trim();
      if (sensitive.indexOf(key) >= 0 || key === 'totpUri') {
        throw new Error('"' + key + '" is a secret: paste it in the secret box and choose it under "Stored as".');
      }
      data[key] = line.slice(eq + 1).trim();
    }
    const type = form.elements.tokenType.value.trim();
    if (type !== '') {
      data.tokenType = type;
    }
    const secret = secretBox.value.replace(/[\r\n]+$/, '');
    if (secret === '') {
      throw new Error('Paste the secret first.');
    }
    data[form.elements.field.value] = secret;
    return data;
  }

  form.addEventListener('submit', async function (event) {
    event.preventDefault();
    storedMeta.hidden = true;
    let data;
    try {
      data = tokenData();
    } catch (e) {
      show('error', e.message);
      return;
    }
    button.disabled = true;
    show('pending', 'Storing…');
    let answer;
    let body;
    try {
      answer = await fetch('v1/store', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ ticket: ticket, service: service, tokenData: data }),
        credentials: 'omit',
        cache: 'no-store',
        referrerPolicy: 'no-referrer',
      });
      body = await answer.json();
    } catch (e) {
      show('error', 'The keyholder could not be reached or answered oddly: nothing is known to be stored.');
      return;
    } finally {
      // The secret leaves the page whatever happened; the ticket is single use anyway.
      secretBox.value = '';
      data = null;
    }
    if (answer.ok) {
      show('ok', 'Stored the credential of ' + body.service + ' in this keyholder.');
      storedMeta.textContent = JSON.stringify(body.meta, null, 2);
      storedMeta.hidden = false;
    } else {
      show('error', 'Not stored (' + body.error + '): ' + body.message +
        '. Ask the platform for a new store link.');
    }
  });
})();
