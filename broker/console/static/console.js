// keybroker console: copy, download, and the secret-once page's guards.
// No inline script (CSP).
"use strict";

// The secret-once page: no way out of it until the box is ticked (links and forms are
// held, closing or reloading the tab asks first), and the secret does not outlive it:
// it leaves the page as the page is hidden, so neither the back/forward cache nor a tab
// left open after the tick keeps it.
function guardSecretOnce() {
  const dialog = document.getElementById("secret-once");
  if (!dialog) {
    return;
  }
  const box = document.getElementById("confirm-copied");
  const unsaved = () => dialog.isConnected && !box.checked;
  const hold = (event) => {
    if (!unsaved() || dialog.contains(event.target)) {
      return;
    }
    event.preventDefault();
    document.getElementById("leave-note").hidden = false;
    box.focus();
  };
  document.addEventListener("click", (event) => {
    if (event.target.closest("a[href]:not([download])")) {  // a download stays here
      hold(event);
    }
  });
  document.addEventListener("submit", hold);
  box.addEventListener("change", () => {
    document.getElementById("leave-note").hidden = true;
  });
  window.addEventListener("beforeunload", (event) => {
    if (unsaved()) {
      event.preventDefault();
      event.returnValue = "";  // older browsers ask only when this is set
    }
  });
  const blank = () => {
    if (dialog.isConnected) {
      dialog.remove();
      document.getElementById("secret-gone").hidden = false;
    }
  };
  window.addEventListener("pagehide", blank);
  document.addEventListener("visibilitychange", () => {
    // Before the tick the operator may be switching to a password manager to paste it.
    if (document.visibilityState === "hidden" && !unsaved()) {
      blank();
    }
  });
  window.addEventListener("pageshow", (event) => {
    if (event.persisted) {  // restored from the back/forward cache
      blank();
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  guardSecretOnce();
  for (const button of document.querySelectorAll("button[data-copy]")) {
    button.addEventListener("click", async () => {
      const text = document.getElementById(button.dataset.copy).textContent.trim();
      try {
        await navigator.clipboard.writeText(text);
        button.textContent = "Copied";
      } catch (error) {
        const range = document.createRange();
        range.selectNodeContents(document.getElementById(button.dataset.copy));
        const selection = window.getSelection();
        selection.removeAllRanges();
        selection.addRange(range);
        button.textContent = "Selected: press Ctrl+C";
      }
    });
  }
  const download = document.getElementById("download");
  if (download) {
    download.addEventListener("click", () => {
      const key = document.getElementById(download.dataset.key).textContent.trim();
      const secret = document.getElementById(download.dataset.secret).textContent.trim();
      const body = JSON.stringify({ key: key, secret: secret }, null, 2) + "\n";
      const link = document.createElement("a");
      link.href = URL.createObjectURL(new Blob([body], { type: "application/json" }));
      link.download = "access-key-" + key + ".json";
      document.body.appendChild(link);
      link.click();
      link.remove();
    });
  }
  for (const button of document.querySelectorAll("button[data-needs]")) {
    const box = document.getElementById(button.dataset.needs);
    const sync = () => { button.disabled = !box.checked; };
    box.addEventListener("change", sync);
    sync();
  }
});
