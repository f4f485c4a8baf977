// Render the \( ... \) and \[ ... \] spans that pymdownx.arithmatex (generic mode) leaves in the page.
// Material replaces page content on instant navigation, so render on every document$ emission.
function renderMath() {
  renderMathInElement(document.body, {
    delimiters: [
      { left: "\\[", right: "\\]", display: true },
      { left: "\\(", right: "\\)", display: false },
    ],
    throwOnError: false,
  });
}

if (typeof document$ !== "undefined") {
  document$.subscribe(renderMath);
} else {
  document.addEventListener("DOMContentLoaded", renderMath);
}
