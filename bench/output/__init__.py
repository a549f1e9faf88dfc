"""Results documents and what is made of them: the validated JSON schema (`results`), the
Markdown tables (`report`), the plots (`plots`) and the files a suite writes (`files`)."""
