// keybroker console: copy, download and the secret dialog's Close. No inline script (CSP).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
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
