"""One proxied request, end to end: joins translate, accounts, upstream and http. The only package that imports all four."""
