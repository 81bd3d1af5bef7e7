// Ctrl+Enter (Cmd+Enter on a Mac) in any prompt box queues its tab's job: the tab's "Add to queue" button
// (#gen-queue, #edit-queue, ...), or in a tab without one its visible primary button (Train's start).
// Gradio runs this once when the page loads.
() => {
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey)) return;
    const box = event.target;
    if (!box || box.tagName !== "TEXTAREA") return;
    const panel = box.closest("[role='tabpanel']") || document;
    const usable = (b) => b.offsetParent !== null && !b.disabled;
    const queue = Array.from(panel.querySelectorAll("button[id$='-queue']")).find(usable);
    const run = queue || Array.from(panel.querySelectorAll("button[id$='-generate'], button.primary")).find(usable);
    if (run) {
      event.preventDefault();
      run.click();
    }
  });
}
