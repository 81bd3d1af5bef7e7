// Ctrl+Enter (Cmd+Enter on a Mac) in any prompt box runs its tab's job: the visible primary button of the tab
// that holds the box (Generate, Edit, ...). Gradio runs this once when the page loads.
() => {
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey)) return;
    const box = event.target;
    if (!box || box.tagName !== "TEXTAREA") return;
    const panel = box.closest("[role='tabpanel']") || document;
    // The tab's run button (#gen-generate, #edit-generate, ...), else its first visible primary button.
    const buttons = Array.from(panel.querySelectorAll("button[id$='-generate'], button.primary"));
    const run = buttons.find((b) => b.offsetParent !== null && !b.disabled);
    if (run) {
      event.preventDefault();
      run.click();
    }
  });
}
