#!/bin/sh
# stands in for procmail: keeps the message where the mda is run from
cat > "$HOME/procmail.out" 2>/dev/null || cat > /dev/null
