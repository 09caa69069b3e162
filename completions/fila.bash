_fila_completion() {
    local IFS=$'
'
    COMPREPLY=( $( env COMP_WORDS="${COMP_WORDS[*]}" \
                   COMP_CWORD=$COMP_CWORD \
                   _FILA_COMPLETE=complete_bash $1 ) )
    return 0
}

complete -o default -F _fila_completion fila